"""Knowledge distillation: a small student learns from one or more teachers (`agecli distill`).

    distill(run, teachers=["dlib-age"], student="mobilenet", method=["soft"])

The student is trained by the shared loop (`agecli.engine.loop.fit`); distillation only
supplies its loss, a weighted sum of named terms built from a registry (torchdistill-style),
and the input function that shows a teacher the very crop the student sees, e.g.

    soft:    L = 0.5 * gt + 1 * soft                     (Hinton et al. 2015)
    pseudo:  L = 0.5 * gt + 1 * pseudo                   (Greco et al. 2021)
    hint:    L = 0.5 * gt + 1 * hint                     (FitNets, Romero et al. 2015)
    ordinal: L = 0.5 * gt + 1 * soft + 1 * ordinal       (Zhao et al. 2021)

`pseudo` trains on an unlabelled face set (`--unlabelled RUN`, its labels ignored, or the
training faces whose labels `--labelled-fraction` hides) together with the labelled one, the
teacher labelling it; `ordinal` adds a ranking teacher, trained
here to put shuffled sequences of k faces back in age order (ListMLE), whose features and
order the student must reproduce; `soft` then adds the dark knowledge of the classification
teacher(s) given with --teacher.

Teacher outputs are cached in RUN/teacher_cache/ (keyed by teacher, faces and crops, so that
every student of a run shares them) when the student's inputs do not change between epochs
(--no-augment); with augmentation the teachers see the very batch the student sees,
un-normalised and re-prepared their own way (see agecli.stages.teachers), or, with
--teacher-views K, label K fixed augmented crops per face once (`TeacherViews`).

The package, read top-down:

    losses   the terms, their registry and DistillLoss (each prints its formula)
    stores   ConcatStore: a labelled and an unlabelled store read as one; store_key
    feeds    TeacherTable, TeacherViews, LiveTeacher: the teacher's answers for each batch
    student  Student: what fit trains (student + the loss's learned parts); feature widths
    ranker   the ranking teacher of --method ordinal (ListMLE)
    stage    distill(): checks, teacher binding, loss, fit, scoring next to the teacher

Its options (methods, weights, temperature, teacher views, ...) are `agecli.options.DistillOptions`.
"""

from agecli.options import METHODS, DistillOptions
from agecli.stages.distill.feeds import CropForTeacher, LiveTeacher, RowPositions, TeacherTable, TeacherViews
from agecli.stages.distill.losses import LOSSES, Context, DistillLoss, Term, build_loss, register_loss
from agecli.stages.distill.ranker import listmle, rank_accuracy, train_rank_teacher
from agecli.stages.distill.stage import distill
from agecli.stages.distill.stores import ConcatStore, store_key
from agecli.stages.distill.student import Student

__all__ = ["LOSSES", "METHODS", "ConcatStore", "Context", "CropForTeacher", "DistillLoss", "DistillOptions",
           "LiveTeacher", "RowPositions", "Student", "TeacherTable", "TeacherViews", "Term", "build_loss", "distill",
           "listmle", "rank_accuracy", "register_loss", "store_key", "train_rank_teacher"]

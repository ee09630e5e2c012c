"""The pipeline's stages, one module (or package) each, every one usable from Python:
prepare -> train / distill -> evaluate -> bench -> export -> predict -> report.

Stages import the layers below them (engine, modeling, data, root helpers) and, where one
stage builds on another (distill learns from `teachers`), the stage it builds on. `common`
holds the prelude and epilogue that train and distill share around the engine's loop."""

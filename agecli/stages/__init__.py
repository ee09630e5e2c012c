"""The pipeline's stages, one module (or package) each, every one usable from Python:
prepare -> train / distill -> evaluate -> bench -> export -> predict -> report.

Stages import the layers below them (engine, modeling, data, root helpers) and, where one
stage builds on another (distill trains with `train`'s helpers, bench scores with
`evaluate`), the stage it builds on."""

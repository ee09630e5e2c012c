"""Models: backbones (torchvision and the ported dlib networks), age encodings, the age
model and its self-describing checkpoint.

Imports only agecli's root helpers."""

"""mmopd: on-policy distillation of a student model from a teacher on the student's own episodes."""

__version__ = "0.1.0"

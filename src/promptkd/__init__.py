"""promptkd: knowledge distillation of generative LMs with student-friendly soft prompts."""

__version__ = "0.1.0"

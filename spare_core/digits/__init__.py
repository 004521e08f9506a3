"""The embedded default model of spare_core: a tiny SD-structured text-to-image model trained here
on scikit-learn's 8x8 digits, its flow-matching twin (digits-dit: an SD3 transformer with the same
text encoder), its digit classifier, and the SPEC 4 benchmark metrics.

    from spare_core.digits import load_default_model, load_classifier, generate_digits
"""
from .data import EMPTY_PROMPT, NAMES, PROMPTS, load_digit_images, pattern_image, prompt_for
from .metrics import (CLASSIFIER, DEFAULT_MODEL, DIT_MODEL, EMBEDDED_MODELS, PATTERN_MODEL,
                      PATTERN_RADIUS, SAMPLE_GUIDANCE, SAMPLE_STEPS, classify, fd_per_class, frechet_distance, generate_digits,
                      generate_unconditional, load_classifier, load_default_model,
                      load_pattern_model, pattern_rate, per_class_accuracy, retain_accuracy,
                      unlearning_accuracy)

__all__ = [
    "CLASSIFIER", "DEFAULT_MODEL", "DIT_MODEL", "EMBEDDED_MODELS", "EMPTY_PROMPT", "NAMES", "PATTERN_MODEL", "PATTERN_RADIUS",
    "PROMPTS", "SAMPLE_GUIDANCE", "SAMPLE_STEPS", "classify", "fd_per_class", "frechet_distance",
    "generate_digits", "generate_unconditional", "load_classifier", "load_default_model",
    "load_digit_images", "load_pattern_model", "pattern_image", "pattern_rate",
    "per_class_accuracy", "prompt_for", "retain_accuracy", "unlearning_accuracy",
]

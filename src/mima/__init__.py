"""mima: multi-concept immunization of text-to-image diffusion models (MIMA, IMMA), with attacks and evaluation."""

import logging

# mima runs without torchvision on purpose (its wheels break the CPU torch); transformers then warns, on every
# import of a diffusers pipeline, that it falls back to its PIL image processors, which is exactly what we want.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)

"""Image restoration with an instruction-editing pipeline (FLUX.1 Kontext, InstructPix2Pix): the restorer, the
synthetic degradations that make training and test pairs, and the quality metrics that score restored images."""

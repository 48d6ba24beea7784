"""bitstream: CoBit (entropy-gated continuous bitstream diffusion) as a reproducible pipeline.

The public pieces (see README, "Library use"):

* :mod:`bitstream.bits` -- token ids <-> bits codec (spec §1.2)
* :mod:`bitstream.diffusion` -- VE process, matched filter, losses (spec §2-§4)
* :mod:`bitstream.schedule` -- entropy-rate schedule and sigma grids (spec §5)
* :mod:`bitstream.model` -- the SDT denoiser (spec §6-§7)
* :mod:`bitstream.samplers` -- DDIM / Heun samplers with entropy-gated churn (spec §8)
* :mod:`bitstream.metrics` -- GenPPL, unigram entropy, MAUVE, VLB (spec §9)

Every pipeline stage is a module runnable as ``python -m bitstream.<stage>``.
"""

__version__ = "0.1.0"

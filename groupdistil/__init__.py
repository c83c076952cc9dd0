"""GroupDistil: group-robust knowledge distillation (the shared engine).

The engine holds what every dataset shares: per-sample losses (:mod:`.losses`), group weighting
(:mod:`.weighting`), the methods (:mod:`.methods`), the trainer (:mod:`.trainer`), reports and the command line.
Dataset pipelines plug in through :class:`groupdistil.pipeline.Pipeline`; the engine never imports one.
"""
__version__ = "0.1.0"

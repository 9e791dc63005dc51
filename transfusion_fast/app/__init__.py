"""The demo application built on the library: train, sample and evaluate Transfusion models on
real data that ships offline (handwritten digits with captions, sine and CSV time series).

* :mod:`~transfusion_fast.app.presets` — the one registry of run defaults per task;
* :mod:`~transfusion_fast.app.tasks` — the tasks: data, model config, samples, evaluation;
* :mod:`~transfusion_fast.app.trainer` — the training loop (checkpoints, resume);
* :mod:`~transfusion_fast.app.cli` — ``transfusion-fast`` / ``python -m transfusion_fast``;
* :mod:`~transfusion_fast.app.data`, :mod:`~transfusion_fast.app.metrics`,
  :mod:`~transfusion_fast.app.tokenizer` — datasets, metrics and PNG writer, byte tokenizer.

It uses only the public library (``Model``, ``pack``, ``generate``, checkpoints); nothing in the
library imports it.
"""

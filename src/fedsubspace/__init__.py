"""fedsubspace: federated LoRA fine-tuning with geometry-aware server aggregation.

One round, and the module each step lives in (every module visited once, in this order):

1. config      ``configure.load_config``: YAML + ``--set``, validated once at the edge: the core keys
               (``config``), each method's own options (``methods/<name>.py``), models and tasks.
2. experiment  ``experiment.prepare`` (once per run): data (``data/``, ``tasks``), tokens (``scoring``),
               client partitions, the model (``models/``) with its LoRA adapters (``adapters``) and the
               initial ``state.GlobalState``.
3. sampling    ``experiment.sample_clients(seed, round)``, the same draw in every runner
               (``simulation`` in-process, ``flower/strategy`` on Flower).
4. client      ``client.run_round``: the method's view of the state (``methods/``) crosses to the
               client's device (``placement``), trains (DP-SGD: ``privacy/dpsgd``) and returns a
               ``state.ClientUpdate``; what travels is ``state.flatten`` (``flower/payload`` on Flower).
5. server      ``server.RoundServer.aggregate``: client-level DP (``privacy``), the method's rule
               (``methods/<name>.py`` on ``lowrank``'s factored maths), ``diagnostics`` of the round.
6. evaluation  ``evaluate.evaluate_model`` (global or personalised, -> ``scoring.evaluate``); per-example
               ``predictions`` at round 0, the best and the last round.
7. results     ``server.RoundServer.record`` -> ``results.RunDirectory``: the metrics line (``tracking``
               mirrors it) and the round's checkpoint (``state.save_state``). After the run: ``experiments/``
               (matrix, report, paired statistics), ``export`` and ``evaluation`` for the trained adapter.
"""

__version__ = "0.1.0"

"""Dose-response evaluation on held-out probes, with baselines, metrics and a report.

* ``scoring``: forward passes that score probe items and neutral text at given coefficients;
* ``metrics``: the summary numbers (fit, validity share, monotone, shift within a ΔNLL budget);
* ``methods``: what is swept (the adapter, steering vectors, prompting, peers) and the
  baseline registry;
* ``sweep``: every method over its coefficients and probes, the budget search, ``evaluate_run``;
* ``report``: markdown / CSV / JSON / plot / wandb, and the one table writer.

Probe kinds (``probes``; never used for training):
* self_report: a self-description prompt, assistant turn opened ("I am");
  y = logsumexp log P(positive words) - logsumexp log P(negative words) at the next token.
* facts: an assistant-turn opening of a fact; y = log P(true cont.) - log P(false cont.).
* yes_no: an honesty dilemma; y = log P(honest answer) - log P(other) at the first
  assistant token, each side summed over variants (Yes / " Yes" / yes).
"""

"""Evaluation: held-out bits/dim of a workdir (``bpd``), judging generated digits (``digits``), and the
digits demo's scoring step and report (``demo``, ``report``).

Submodules are imported on use (``from starflow2_jax.eval.digits import DigitsJudge``) so that
importing this package stays cheap.
"""

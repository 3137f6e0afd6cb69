"""ctpo: Cumulative Token Policy Optimization, reproducibly (arXiv 2605.07331).

Where things are:
  ctpo.losses          the importance ratios and policy losses (rho_cum is `cumulative_log_ratio`)
  ctpo.verl_plugin     registers the losses in verl's POLICY_LOSS_REGISTRY (import it via external_lib)
  ctpo.sandbox         the hardened Python sandbox for tool calls
  ctpo.agent           the multi-turn tool-integrated reasoning loop
  ctpo.reward          math-verify rewards (the strict grader, and the worker pool)
  ctpo.release_reward  the release's grader (ctpo.grading selects one per experiment)
  ctpo.train           CPU toy backend (local) and the verl GPU launcher
  ctpo.eval            avg@k evaluation
  ctpo.diagnostics     log-ratio variance and clip-rate diagnostics (Figure 1)
  ctpo.reports         Tables 1-3 and Figures 1-2 from results/
"""
__version__ = "0.1.0"

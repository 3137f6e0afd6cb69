"""Tables 1-3 and Figures 1-2 from results/ (`python -m ctpo.reports`); never imports torch.

  table1.py     the Monte-Carlo bias/variance study behind Table 1 (exact enumeration + MC)
  load.py       the experiment and the results/ tree (ctpo.layout paths); missing inputs name the file
  tables.py     Tables 1-3 as Markdown + LaTeX (booktabs) + tables.json
  figures.py    Figures 1-2 as PDF + PNG
  synthetic.py  a SYNTHETIC paper-size results tree for the benchmark and tests
  wandb_log.py  tables, figures and summary numbers to W&B
"""

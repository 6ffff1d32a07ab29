"""Report: compare results for CI (check), inspect written folders, sweep methods × sparsities."""

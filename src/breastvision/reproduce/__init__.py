"""One-command reproductions of the papers' comparison tables, under their protocols and leak-free."""

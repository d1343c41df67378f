"""raydistill workflows: thin Ray drivers, one module per CLI verb (*when and where*)."""

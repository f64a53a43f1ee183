"""The deployer: gates benchmark results, keeps campaign rounds and budgets, writes the registry."""

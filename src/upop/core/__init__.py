"""The UPop core: structures, ranking, schedule, plan, Pruner. It names no model family."""

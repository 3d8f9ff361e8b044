"""The HTTP edge: commands, operations, push endpoints, and the problem documents they answer with."""

"""The recipe: its schema, its one reader, and its commented rendering."""

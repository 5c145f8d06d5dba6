"""Recipes: the typed schema, the YAML loader, and sweep expansion."""

from orchestrator.recipe.loader import LoadedRecipe, dump_recipe, load_recipe, load_recipe_text
from orchestrator.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "dump_recipe", "load_recipe", "load_recipe_text"]

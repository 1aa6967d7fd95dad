"""YAML recipes: alloykit's own schema, and mergekit's translated into it."""

from alloykit.recipe.schema import Recipe, load_recipe, recipe_from_dict

__all__ = ["Recipe", "load_recipe", "recipe_from_dict"]

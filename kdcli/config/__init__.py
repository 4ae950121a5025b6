"""Recipes: pydantic schemas (`schema`) and YAML loading with `key=value` overrides (`load`)."""

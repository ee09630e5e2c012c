"""Build hook: the recipes (recipes/*.yaml, at the top of the repository for users of a
checkout) travel inside the wheel as agecli/recipes/bundled/, where `agecli run NAME` finds
them (agecli.recipes.recipe.recipe_dirs). Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES = Path(__file__).resolve().parent / "recipes"


class BuildWithRecipes(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "agecli" / "recipes" / "bundled"
        self.mkpath(str(target))
        for recipe in sorted(RECIPES.glob("*.yaml")):
            self.copy_file(str(recipe), str(target / recipe.name))


setup(cmdclass={"build_py": BuildWithRecipes})

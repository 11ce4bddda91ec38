"""Built-in distillation methods, one file each.

Importing this package imports every module in it, and their ``@register`` decorators fill the
registry; shared pieces (losses, generators, image priors) are plain modules beside them.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

"""The scheme zoo: published methods and the field's recipes, each a short composition of
the combinators (docs/schemes.md), with their parts: heads, losses, leap trunks, splits and
the released tables.

>>> import mlaan_func as mf
>>> net = mf.from_module(mf.models.CifarResNet(14, num_classes=10, widths=(4, 8, 8)))
>>> [o.name for o in mf.schemes.mlaan(net, ["1.1", "2.1"], input_shape=(3, 8, 8))][:2]
['m1.cascaded', 'm1.independent']
"""

from . import heads, imagenet_heads, labels, losses, splits, tables, trunks
from .by_name import RECIPES, RESTORES_IMAGE, SCHEMES, build, method_name
from .catalog import (
                      CIFAR10_MEAN,
                      CIFAR10_STD,
                      DEFAULT_LAMBDAS,
                      DEFAULT_WIDTH,
                      classifier_head,
                      dgl,
                      dgl_mlaan,
                      e2e,
                      imagenet_infopro_head,
                      infopro,
                      infopro_head,
                      infopro_loss,
                      infopro_mlaan,
                      mlaan,
                      module_shapes,
                      multilaminar,
                      num_classes_of,
                      stage_fraction,
                      window_width,
)
from .recipes import (
                      auglocal,
                      auglocal_depths,
                      ensemble_metric,
                      hpff,
                      lm_local,
                      man,
                      man_pp,
                      neuron_groups,
                      pgl,
                      sgr,
                      uniform_layers,
)

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DEFAULT_LAMBDAS", "DEFAULT_WIDTH", "RECIPES", "RESTORES_IMAGE", "SCHEMES", "auglocal",
           "auglocal_depths", "build", "classifier_head", "dgl", "dgl_mlaan", "e2e", "ensemble_metric", "heads",
           "hpff", "imagenet_heads", "imagenet_infopro_head", "infopro", "infopro_head", "infopro_loss",
           "infopro_mlaan", "labels", "lm_local", "losses", "man", "man_pp", "method_name", "mlaan", "module_shapes",
           "multilaminar",
           "neuron_groups", "num_classes_of", "pgl", "sgr", "splits", "stage_fraction", "tables", "trunks",
           "uniform_layers", "window_width"]

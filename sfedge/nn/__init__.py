"""Layers: SFConv2d, the NMF layer, the flattening regularizer, factorize/fold, cost counting."""

from sfedge.nn.conv import CONV_KINDS, ConvSpec, create_conv2d
from sfedge.nn.cost import count_macs, count_params, macs_by_module
from sfedge.nn.factorize import FactorizeReport, LayerChange, factorize, factorized_ranks, fold
from sfedge.nn.flatness import FLATNESS_MODES, LayerFlatness, flatness_loss, flatness_report, kl_to_uniform
from sfedge.nn.nmf import NMF, NMF_METHODS, hals_step, mu_step, set_nmf_iterations
from sfedge.nn.sfconv import SFConv2d, rank_for

__all__ = [
    "CONV_KINDS", "ConvSpec", "create_conv2d", "count_macs", "count_params", "macs_by_module",
    "FactorizeReport", "LayerChange", "factorize", "factorized_ranks", "fold", "FLATNESS_MODES", "LayerFlatness",
    "flatness_loss", "flatness_report", "kl_to_uniform", "SFConv2d", "rank_for",
    "NMF", "NMF_METHODS", "hals_step", "mu_step", "set_nmf_iterations",
]

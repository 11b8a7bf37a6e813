"""Making the best checkpoint smaller or faster: pruning (torch side), int8 quantization (onnxruntime
side), and choosing which variant ships.

  pruning.py       structured (torch-pruning) and unstructured (L1) pruning, with a fine-tune
  quantization.py  onnxruntime dynamic and static (QDQ) int8
  recipes.py       the recipes of conf/compress/: their steps, their settings, checked
  choose.py        the metric budget and the rule that picks the shipped variant
"""

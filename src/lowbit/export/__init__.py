"""Export a quantized lowbit model into the files other programs run: GGUF for llama.cpp (:mod:`.gguf`) and
compressed-tensors for transformers and vLLM (:mod:`.compressed`).

An export writes exactly the numbers lowbit's fake-quant model computes with: the weights must already lie on the
target format's grid (a recipe quantized them onto it), and parts the other runtime cannot execute are refused with
one line naming the nearest recipe that can be exported. Nothing is imported here, so each format's dependencies
load only when that format is written.
"""

"""One module per op: its reference, Triton kernels, custom op + autograd and public function.

The package ``ssltm_kernels`` re-exports the public functions; import a submodule
(``ssltm_kernels.ops.window_attention_3d``) for an op's internals. Nothing is re-exported here, so
every submodule name stays a module.
"""

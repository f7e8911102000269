"""A fix for old Triton interpreters, which the kernel tests run under on machines without a GPU
(in the test process and in the ranks it starts)."""

def fix_old_triton_interpreter_index():
    """Triton 3.5's interpreter turns a program id (a shape-(1,) array) into a Python int with
    ``int(array)``, which numpy 2.5 refuses ("only 0-dimensional arrays can be converted"), so
    ``range(tl.program_id(0), ...)`` fails under the interpreter only. Triton 3.8 converts with
    ``int(array.squeeze())``; do the same on the versions that do not."""
    import inspect

    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "squeeze" in inspect.getsource(original):
        return

    def patch_lang_tensor(tensor, *args, **kwargs):
        original(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    interpreter._patch_lang_tensor = patch_lang_tensor

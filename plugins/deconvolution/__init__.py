"""The built-in model families of the deconvolution task class."""

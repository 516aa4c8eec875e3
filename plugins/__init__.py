"""Built-in refinement models, registered in the ``rqml_dask.models`` entry-point group."""

"""Trust between nodes: the cluster's Central Authority (:mod:`rqml_dask.trust.ca`) and the
``pqtls://`` Dask transport (:mod:`rqml_dask.trust.transport`): mutual TLS 1.3 with ML-DSA-65
certificates and the hybrid X25519MLKEM768 key exchange."""

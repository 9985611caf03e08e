"""Feature attributions served beside predictions.

``config``      the ``explain:`` section of a model's config.yaml
``background``  the background sample kept beside the reference profile
``linear``      exact attributions of affine (linear / logistic) graphs
``trees``       ONNX-ML TreeEnsemble* parsed for shap's TreeSHAP
``kernel``      KernelSHAP (shap) with one batched ONNX Runtime run per request
``explainer``   picks the method for a model and runs it (process side)
``worker``      the explain pool's process entry point
``service``     the pool, admission, deadlines, permission, the pipeline hook, sampling
``importance``  global importance per window and its shift (metrics, drift report)
``report``      the importance section of the drift report
"""

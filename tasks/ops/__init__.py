"""Operations: the ``model.retrained`` event, the MLflow registry webhook receiver, model URIs."""

"""Python client for loraforge: the seed SDK's workflow over the gRPC contracts.

from loraforge.client import Client

client = Client()                                   # addresses from LORAFORGE_*_ADDRESS
app = client.create_app("demo")
dataset = app.create_dataset("sentiment")
dataset.upload_from_csv("train.csv")
version = dataset.create_version()
model = app.create_model("sentiment-model", model_type_id="text-to-text")
model.get_params(template="HuggingFace_AdvancedConfig", save_to="params.yaml")
model.update_params(dataset_version=version.name, trainer_config={"num_train_epochs": 2})
version_id = model.train()
model.training_status(version_id, training_logs=True)
model.predict_by_bytes(b"...").outputs[0].data.text.raw
"""

from loraforge.client.client import (
    App,
    Client,
    ClientError,
    Dataset,
    Model,
    Prediction,
    PredictionOutput,
    TrainingStatus,
)

__all__ = [
    "App",
    "Client",
    "ClientError",
    "Dataset",
    "Model",
    "Prediction",
    "PredictionOutput",
    "TrainingStatus",
]

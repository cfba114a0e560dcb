"""Who may call each RPC of each service (see `auth` for the scopes and identities).

One entry per RPC, by its full method name. Reads need `read`; creating, changing and
deleting an app's datasets, models and adapters need `write`; starting and cancelling
training runs, and starting evaluations, `train`; predictions `predict`. Apps and keys
are an admin's. Lists that name no parent (apps, adapters) are open to any key and show
it only its own app. A `predict` key may also list its app, models and model versions,
so that it can see which models it may call.
Internal RPCs accept only the service identity that calls them.
"""

from __future__ import annotations

from typing import Any

from loraforge.services.common.auth import (
    ADMIN,
    PREDICT,
    READ,
    TRAIN,
    WRITE,
    Need,
    Rule,
    anywhere,
    app_in,
    internal,
    nothing,
    on,
    rule,
)

DATASET = "/loraforge.dataset.v1.DatasetService/"
TRAINER = "/loraforge.trainer.v1.TrainerService/"
PREDICTOR = "/loraforge.predictor.v1.PredictorService/"
AUTH = "/loraforge.auth.v1.AuthService/"


# The lists `GET /v1/models` is built from: a key that may predict may list what it may
# call (its own app, its models and their versions).
LISTING = {READ: (PREDICT,)}


def _admin(_request: Any) -> list[Need]:
    return [(ADMIN, "*")]


def _train_on_data(request: Any) -> list[Need]:
    """A run needs `train` on its app and `read` on the app of the data it trains on (and of
    the version it continues from)."""
    needs = [(TRAIN, app_in(request.parent, "parent"))]
    if request.dataset_version:
        needs.append((READ, app_in(request.dataset_version, "dataset_version")))
    if request.from_model_version:
        needs.append((READ, app_in(request.from_model_version, "from_model_version")))
    return needs


def _evaluate(request: Any) -> list[Need]:
    """An evaluation runs the app's model, as training does, on data its key may read."""
    needs = [(TRAIN, app_in(request.parent, "parent"))]
    if request.dataset_version:
        needs.append((READ, app_in(request.dataset_version, "dataset_version")))
    return needs


def _compare(request: Any) -> list[Need]:
    needs = [(READ, app_in(request.evaluation, "evaluation"))]
    if request.other:
        needs.append((READ, app_in(request.other, "other")))
    return needs


def _predict(request: Any) -> list[Need]:
    """The base model is open to any key that may predict; an adapter to its app's keys."""
    if request.base_model and not request.model:
        return [(PREDICT, "*")]
    return [(PREDICT, app_in(request.model, "model"))]


POLICY: dict[str, Rule] = {
    # Apps
    DATASET + "CreateApp": rule(_admin),
    DATASET + "GetApp": rule(on(READ, "name"), services=["trainer"]),
    DATASET + "UpdateApp": rule(on(WRITE, "app.name")),
    DATASET + "ListApps": rule(anywhere(READ), services=["trainer"], alternatives=LISTING),
    DATASET + "DeleteApp": rule(_admin),
    # Datasets and their inputs
    DATASET + "CreateDataset": rule(on(WRITE, "parent")),
    DATASET + "GetDataset": rule(on(READ, "name")),
    DATASET + "UpdateDataset": rule(on(WRITE, "dataset.name")),
    DATASET + "ListDatasets": rule(on(READ, "parent"), services=["trainer"]),
    DATASET + "DeleteDataset": rule(on(WRITE, "name")),
    DATASET + "UploadInputs": rule(on(WRITE, "header.dataset")),
    DATASET + "AddInputs": rule(on(WRITE, "parent")),
    DATASET + "ListInputs": rule(on(READ, "parent")),
    DATASET + "DeleteInputs": rule(on(WRITE, "parent")),
    # Versions
    DATASET + "CreateDatasetVersion": rule(on(WRITE, "parent")),
    DATASET + "GetDatasetVersion": rule(on(READ, "name"), services=["trainer"]),
    DATASET + "ListDatasetVersions": rule(on(READ, "parent"), services=["trainer"]),
    DATASET + "DeleteDatasetVersion": rule(on(WRITE, "name")),
    DATASET + "ReadDatasetVersion": rule(on(READ, "name"), services=["worker", "trainer"]),
    DATASET + "AddDatasetVersionReference": internal("trainer"),
    DATASET + "RemoveDatasetVersionReference": internal("trainer"),
    # Keys
    AUTH + "CreateApiKey": rule(_admin),
    AUTH + "ListApiKeys": rule(_admin),
    AUTH + "RevokeApiKey": rule(_admin),
    AUTH + "VerifyApiKey": internal("trainer", "predictor"),
    AUTH + "WhoAmI": rule(nothing, services=["trainer", "worker", "predictor"]),
    # The catalogue: any key
    TRAINER + "ListModelTypes": rule(nothing),
    TRAINER + "ListTemplates": rule(nothing),
    TRAINER + "GetTemplate": rule(nothing),
    TRAINER + "ListBaseModels": rule(nothing),
    # Models and their versions (training runs)
    TRAINER + "CreateModel": rule(on(WRITE, "parent")),
    TRAINER + "GetModel": rule(on(READ, "name"), services=["predictor"]),
    TRAINER + "UpdateModel": rule(on(WRITE, "model.name")),
    TRAINER + "ListModels": rule(on(READ, "parent"), alternatives=LISTING),
    TRAINER + "DeleteModel": rule(on(WRITE, "name")),
    TRAINER + "CreateModelVersion": rule(_train_on_data),
    TRAINER + "GetModelVersion": rule(on(READ, "name"), services=["predictor"]),
    TRAINER + "ListModelVersions": rule(
        on(READ, "parent"), services=["predictor"], alternatives=LISTING
    ),
    TRAINER + "DeleteModelVersion": rule(on(WRITE, "name")),
    TRAINER + "CancelModelVersion": rule(on(TRAIN, "name")),
    TRAINER + "WatchModelVersion": rule(on(READ, "name")),
    TRAINER + "GetModelVersionLogs": rule(on(READ, "name")),
    TRAINER + "ExportModelVersion": rule(on(READ, "name")),
    TRAINER + "ListCheckpoints": rule(on(READ, "parent")),
    TRAINER + "GetCheckpoint": rule(on(READ, "name"), services=["predictor"]),
    TRAINER + "EstimateModelVersion": rule(_train_on_data),
    # Predictions and the adapters serving them
    # The trainer's evaluations predict with its own identity.
    PREDICTOR + "Predict": rule(_predict, services=["trainer"]),
    PREDICTOR + "PredictStream": rule(_predict),
    PREDICTOR + "LoadAdapter": rule(on(WRITE, "model")),
    PREDICTOR + "UnloadAdapter": rule(on(WRITE, "model")),
    PREDICTOR + "ListAdapters": rule(anywhere(READ)),
    PREDICTOR + "GetServingInfo": rule(nothing, services=["trainer"]),
    # Evaluations of model versions and of base models
    TRAINER + "CreateEvaluation": rule(_evaluate),
    TRAINER + "GetEvaluation": rule(on(READ, "name")),
    TRAINER + "ListEvaluations": rule(on(READ, "parent")),
    TRAINER + "DeleteEvaluation": rule(on(WRITE, "name")),
    TRAINER + "WatchEvaluation": rule(on(READ, "name")),
    TRAINER + "ListEvaluationResults": rule(on(READ, "parent")),
    TRAINER + "CompareEvaluations": rule(_compare),
    TRAINER + "CancelEvaluation": rule(on(TRAIN, "name")),
}

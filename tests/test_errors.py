"""One exception base: every error the project defines is a `FlowersError` and still the built-in it was
before (so `except ValueError` around a call keeps catching it), and one `except fc.FlowersError` catches the
failures of the public API. The CLIs keep their exit codes."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import flowers_apps
import flowers_classifier as fc
import flowers_fastai
from flowers_fastai import cli as commands

# Every exception class of the three packages -> the built-in it derived from before FlowersError. A new one must be
# listed here, which makes its author choose a FlowersError base.
EXCEPTIONS = {
    "flowers_classifier.aot.CpuPackageError": ValueError,
    "flowers_classifier.backends.BackendError": ValueError,
    "flowers_classifier.explain.ExplainError": ValueError,
    "flowers_classifier.hub.HubError": ValueError,
    "flowers_classifier.payload.ModelFileError": ValueError,
    "flowers_classifier.preprocess.InvalidImageError": ValueError,
    "flowers_fastai.calibration.EvaluationError": ValueError,
    "flowers_fastai.data.DatasetError": ValueError,
    "flowers_apps.batch.RayEngineError": RuntimeError,
    "flowers_apps.client.ServeRequestError": ValueError,
    "flowers_apps.cluster.RayUnavailableError": RuntimeError,
    "flowers_apps.demo.AuthError": ValueError,
    "flowers_apps.demo.ExamplesError": ValueError,
    "flowers_apps.records.OutputFileError": ValueError,
    "flowers_apps.serve.BadRequest": ValueError,
    "flowers_apps.serve.ServeConfigError": ValueError,
    "flowers_fastai.experiments.PlanError": ValueError,
    "flowers_fastai.export.ExportError": ValueError,
    "flowers_fastai.hub.ShareError": ValueError,
    "flowers_fastai.onnx_export.OnnxExportError": ValueError,
    "flowers_fastai.pretrained.PretrainedWeightsUnavailable": RuntimeError,
    "flowers_fastai.pretrained.WeightsFileError": ValueError,
    "flowers_fastai.probes.SanityCheckError": RuntimeError,
    "flowers_fastai.train.TrainingInterrupted": Exception,
    "flowers_fastai.wheelhouse.WheelhouseError": Exception,
}


def defined_exceptions() -> dict[str, type[BaseException]]:
    """module.Name -> class, for every exception class defined (not imported) in a module of the packages."""
    found = {}
    for pkg in (fc, flowers_fastai, flowers_apps):
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name == "__main__":  # running it is the CLI
                continue
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_project_exception_is_a_flowers_error_and_keeps_its_builtin_base():
    found = defined_exceptions()
    assert found.pop("flowers_classifier.errors.FlowersError") is fc.FlowersError
    assert fc.FlowersError.__bases__ == (Exception,)
    assert sorted(found) == sorted(EXCEPTIONS), "list a new exception in EXCEPTIONS, with FlowersError as a base"
    for name, cls in found.items():
        assert issubclass(cls, fc.FlowersError), f"{name} does not derive from FlowersError"
        assert issubclass(cls, EXCEPTIONS[name]), f"{name} lost its built-in base {EXCEPTIONS[name].__name__}"


def test_one_except_clause_catches_the_public_api_failures(tmp_path, tiny_cnn_pth):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    for path in (tmp_path / "missing.pth", garbage):
        with pytest.raises(fc.FlowersError, match=str(path)):
            fc.load_model(path)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    try:
        fc.predict(model, not_an_image)
    except fc.FlowersError as e:
        assert isinstance(e, ValueError) and str(not_an_image) in str(e)  # still what `except ValueError` caught
    else:
        pytest.fail("predicting a text file raised no FlowersError")


@pytest.mark.parametrize("error, code", [("TrainingInterrupted", 130), ("SanityCheckError", 1),
                                         ("DatasetError", 2), ("PretrainedWeightsUnavailable", 2),
                                         ("WeightsFileError", 2), ("FileExistsError", 2)])
def test_train_main_exit_codes_are_kept(error, code, monkeypatch, capsys):
    # TrainingInterrupted and SanityCheckError are FlowersErrors too: main must still tell them apart.
    from flowers_fastai import data, pretrained, probes, train
    cls = {c.__name__: c for c in (train.TrainingInterrupted, probes.SanityCheckError, data.DatasetError,
                                    pretrained.PretrainedWeightsUnavailable, pretrained.WeightsFileError,
                                    FileExistsError)}
    message = f"what went wrong ({error})"

    def fail(args):
        raise cls[error](message)

    monkeypatch.setattr(commands, "train_run", fail)
    assert commands.train([]) == code
    assert message in capsys.readouterr().err

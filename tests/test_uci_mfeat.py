import numpy as np
import pytest

from mmbalance.data import build_dataset, list_datasets
from mmbalance.data.uci_mfeat import VIEWS
from mmbalance.registry import ConfigError


def test_embedded_dataset_all_six_views_fixed_stratified_split():
    assert "uci_mfeat" in list_datasets()
    d = build_dataset("uci_mfeat", modalities=list(VIEWS))
    dims = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
    assert d.input_shapes == {m: (dims[m],) for m in VIEWS}
    assert (len(d.train), len(d.val), len(d.test)) == (1200, 400, 400)
    for ds, per in ((d.train, 120), (d.val, 40), (d.test, 40)):
        assert np.bincount(ds.labels.numpy(), minlength=10).tolist() == [per] * 10
    # the split is fixed: building twice gives identical arrays
    d2 = build_dataset("uci_mfeat", modalities=list(VIEWS))
    assert np.array_equal(d.test.arrays["mor"].numpy(), d2.test.arrays["mor"].numpy())


def test_default_views_strong_then_weak_and_any_selection():
    d = build_dataset("uci_mfeat")
    assert d.modalities == ["pix", "fou"]
    d3 = build_dataset("uci_mfeat", modalities=["zer", "kar", "mor"])
    assert d3.modalities == ["zer", "kar", "mor"]
    with pytest.raises(ConfigError) as e:
        build_dataset("uci_mfeat", modalities=["pixels"])
    assert str(e.value) == ("dataset 'uci_mfeat' option 'modalities' takes a list of one of 'fou', 'fac', 'kar', "
                            "'pix', 'zer', 'mor' or null, got ['pixels']")
    with pytest.raises(ConfigError, match="names a modality twice"):
        build_dataset("uci_mfeat", modalities=["pix", "pix"])
    assert build_dataset("uci_mfeat", modalities="fou,pix").modalities == ["fou", "pix"]

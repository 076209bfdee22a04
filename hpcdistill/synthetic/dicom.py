"""A slide file (SVS or pyramidal TIFF, synthetic or scanned) rewritten as a DICOM whole-slide image: a folder holding
one VL Whole Slide Microscopy instance per pyramid level (TILED_FULL, baseline JPEG tiles), as hospitals' archives
serve them and OpenSlide 4 reads them. Written with pydicom from the same pixels, so a test can check that `shard` and
`predict` read the DICOM as they read the source."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyvips
import tifffile
from PIL import Image

from hpcdistill.common.errors import SyntheticError
from hpcdistill.common.files import atomic_output

DICOM_TILE = 256
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"  # uncompressed


def write_dicom_wsi(
    source: str | Path, folder: str | Path, mpp: float, compression: str = "jpeg", quality: int = 95
) -> list[Path]:
    """`source`'s pyramid levels (its tiled TIFF pages: level 0 and each reduced level) as one DICOM instance each in
    `folder` (level-0 pixel spacing `mpp` um); returns the files, level 0 first. `compression` "jpeg": baseline
    JPEG tiles at `quality` (what scanners write); "none": the source's decoded pixels exactly."""
    if compression not in ("jpeg", "none"):
        raise SyntheticError(f"DICOM compression {compression!r}: expected 'jpeg' or 'none'")
    import pydicom.uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    levels = _tiff_levels(Path(source))
    shared = {name: pydicom.uid.generate_uid() for name in ("study", "series", "frame")}
    written = []
    for index, (page, (width, height)) in enumerate(levels):
        pixels = pyvips.Image.tiffload(str(source), page=page).extract_band(0, n=3).numpy()
        spacing = mpp * levels[0][1][0] / width  # um per pixel of this level
        dataset = _instance(pixels, index, spacing, shared, quality if compression == "jpeg" else None)
        path = folder / f"level{index}.dcm"
        with atomic_output(path) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        written.append(path)
    return written


def _tiff_levels(source: Path) -> list[tuple[int, tuple[int, int]]]:
    """(page, (width, height)) of the whole-slide levels: tiled pages, level 0 first (an SVS's stripped thumbnail,
    label and macro are not levels)."""
    with tifffile.TiffFile(source) as tif:
        pages = [(i, (p.imagewidth, p.imagelength)) for i, p in enumerate(tif.pages) if p.is_tiled]
    if not pages:
        raise SyntheticError(f"{source}: no tiled pages to convert to DICOM")
    return pages


def _instance(pixels: np.ndarray, index: int, spacing_um: float, shared: dict[str, str], quality: int | None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    height, width = pixels.shape[:2]
    frames = _tiles(pixels, quality)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = JPEG_BASELINE if quality is not None else EXPLICIT_LITTLE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = shared["study"], shared["series"]
    ds.FrameOfReferenceUID = shared["frame"]
    ds.Modality, ds.InstanceNumber, ds.ContainerIdentifier = "SM", index + 1, "hpcdistill-synthetic"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    colour = "YBR_FULL_422" if quality is not None else "RGB"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, colour, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.Rows = ds.Columns = DICOM_TILE
    ds.NumberOfFrames = len(frames)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width * spacing_um / 1000, height * spacing_um / 1000
    ds.ImagedVolumeDepth = 0.001
    measures = Dataset()
    measures.PixelSpacing = [spacing_um / 1000, spacing_um / 1000]  # mm: rows, then columns
    measures.SliceThickness = 0.001
    group = Dataset()
    group.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 0.0, 0.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    ds.OpticalPathSequence = Sequence([path])
    ds.PixelData = encapsulate(frames) if quality is not None else b"".join(frames)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01" if quality is not None else "00"
    return ds


def _tiles(pixels: np.ndarray, quality: int | None) -> list[bytes]:
    """Row-major DICOM_TILE tiles, the edge ones padded with white, each a baseline JPEG (or, quality None, raw)."""
    height, width = pixels.shape[:2]
    tiles = []
    for row in range(math.ceil(height / DICOM_TILE)):
        for col in range(math.ceil(width / DICOM_TILE)):
            tile = np.full((DICOM_TILE, DICOM_TILE, 3), 255, np.uint8)
            part = pixels[row * DICOM_TILE : (row + 1) * DICOM_TILE, col * DICOM_TILE : (col + 1) * DICOM_TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            if quality is None:
                tiles.append(tile.tobytes())
                continue
            buffer = io.BytesIO()
            Image.fromarray(tile).save(buffer, format="JPEG", quality=quality)
            tiles.append(buffer.getvalue())
    return tiles

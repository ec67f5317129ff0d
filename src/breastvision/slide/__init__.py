"""Whole-slide inference for patch classifiers (``breastvision predict-slide``).

A slide is opened (:mod:`.reader`), tiled at the scale the model was trained at (:mod:`.scale`),
background is dropped from a low-resolution tissue mask (:mod:`.tissue`, :mod:`.tiling`), the
tissue tiles are streamed through the model file's own pre-processing and predicted in batches
(:mod:`.predict`), and the results are written as CSV, QuPath GeoJSON, a heat-map PNG and a JSON
summary (:mod:`.outputs`).

**Reader: OpenSlide** (``openslide-python`` with the ``openslide-bin`` wheel), not tiffslide.
Pathology arrives as SVS, NDPI, MRXS, Philips/Ventana TIFF, pyramidal TIFF and DICOM-WSI;
OpenSlide reads all of them from one C library maintained for that purpose, and its wheel brings
the library with it (no system package). tiffslide reads only the TIFF-based formats (no MRXS,
no DICOM-WSI) and would add zarr and fsspec for it.
"""

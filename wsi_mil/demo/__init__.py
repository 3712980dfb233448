"""The built-in sample cohort (``wsi-mil sample-data``) and synthetic test slides; not on the runtime path.

* :mod:`~wsi_mil.demo.cohort` - a labelled cohort of real tissue from packaged images, with lesion polygons
  (:func:`~wsi_mil.demo.cohort.build_sample_cohort`): its :mod:`~wsi_mil.demo.plan`, the packaged
  :mod:`~wsi_mil.demo.sources`, their :mod:`~wsi_mil.demo.texture`, the tissue and lesion
  :mod:`~wsi_mil.demo.shapes`, and :mod:`~wsi_mil.demo.render` (one slide);
* :mod:`~wsi_mil.demo.broken` - the broken-slide zoo (:func:`~wsi_mil.demo.broken.write_broken_slides`);
* :mod:`~wsi_mil.demo.pyramid` - tiled TIFF/SVS pyramids readable by OpenSlide and tiffslide.

Files are written with the shared writers of :mod:`wsi_mil.store`. Nothing in the pipeline stages
imports this package.
"""

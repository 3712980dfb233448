"""The built-in sample cohort (``wsi-mil sample-data``) and synthetic test slides; not on the runtime path.

* :mod:`~wsi_mil.demo.cohort` - a labelled cohort of real tissue from packaged images, with lesion polygons;
* :mod:`~wsi_mil.demo.pyramid` - tiled TIFF/SVS pyramids readable by OpenSlide and tiffslide.

Nothing in the pipeline stages imports this package.
"""

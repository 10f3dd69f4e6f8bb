"""What the models read: image files, MATLAB-compatible bicubic resizing, the prepare stage's splits and
sub-images, torch datasets, and the file format of the cached member outputs.

May import: srmodels.core.
"""

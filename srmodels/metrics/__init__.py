"""How outputs are scored: PSNR and SSIM with explicit ``crop_border`` and ``y_channel``, and the paired
statistics that compare two models on the same images.

May import: nothing else in srmodels (numpy only).
"""

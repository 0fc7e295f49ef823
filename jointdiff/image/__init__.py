"""Images in and out of a job: starting from an image (image-to-image, inpainting,
outpainting, a photo placed on the sphere) and the PNGs a job writes, which carry the job."""

"""Image files: reading volumes and DICOM series, streamed voxels of .nii.gz and .nrrd, writing labelmaps and
.seg.nrrd; builds on core."""

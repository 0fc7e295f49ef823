"""The surfaces a canvas can live on beyond a flat strip or grid: the sphere (360°
environments: directions, cube faces, perspective views, exports and the viewer) and
textures for 3D assets (seams, atlases)."""

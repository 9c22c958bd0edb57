"""elmm_ray.data"""

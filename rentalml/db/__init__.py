"""rentalml.db"""
